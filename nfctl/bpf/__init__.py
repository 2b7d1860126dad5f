"""The BPF layer below the compiler and the datapath: the bpf() syscall wrapper, what a
loaded program references, private program copies, typed map values, and the contract
(names, sizes, ids) between the generated C code and the datapath that drives it."""
