"""Building NF versions, apart from applying them: compile -> verify -> load -> pin -> map
migration, by calling the compiler and the datapath (nfctl.builder.builder.Builder)."""
