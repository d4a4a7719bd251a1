"""eBPF dataplane: the TC program, its loader, attachment and the batch drain."""
