"""Hand-written @triton.jit kernels and their launchers (DESIGN.md §7); installed as
`odenets_fast.triton_kernels`. No torch.autograd here: the ops in `odenets_fast.ops` wire them in.
"""
