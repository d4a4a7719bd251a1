"""IPFIX (RFC 7011): the element registry, templates and message encoding."""
