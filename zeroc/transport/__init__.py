"""Out-of-band KV transports: a ctypes binding over libnccl, NCCL and CUDA-IPC transports, negotiation."""
