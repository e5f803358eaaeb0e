"""Our Triton kernels, one module per family: `ops` (norms, SwiGLU, MoE combine), `gemv` (decode-step
matrix-vector products), `attention`, `scan`, `mamba` (prompt conv, decode step), and `launch` (PDL).

Imported only where Triton is installed and a tensor is on a GPU (or under Triton's CPU interpreter,
TRITON_INTERPRET=1, which the tests use). A function here has the contract of the same name in
`kernels/reference.py`.
"""
