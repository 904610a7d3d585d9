"""Attention kernels: Triton (CUDA/ROCm), Metal (Apple GPUs) and a pure-torch reference, behind
`kernels.attention.attention`. Nothing heavy is imported here."""
