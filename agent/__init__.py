"""cniflow agent: dataplane-neutral stages (config, flow table, IPFIX, transport, metrics)."""
