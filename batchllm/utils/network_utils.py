"""vLLM's `get_open_port` (`vllm.utils.network_utils`, formerly `vllm.utils`), which its data-parallel example
scripts call to pick the master port they pass to each rank."""

import socket


def get_open_port() -> int:
    """A TCP port on this host that was free when asked (the operating system's choice). As with vLLM's, another
    process may take it before the caller binds it."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("", 0))
        return probe.getsockname()[1]
