"""Pure Flax linen math: no mesh, no device placement, no files, formats or tokenizers.

layers.py        RMSNorm, rotary embedding, SwiGLU
constraints.py   activation sharding hints by logical name (resolved by sharding.activations)
kv_cache.py      the ring-buffer arithmetic: slot = position mod size, writes, the slots' positions
attention.py     grouped-query attention, window mask, the attention kernels behind one switch
paged_attention.py  serving's paged KV cache: AttentionMetadata, the page write, attention over a sequence's pages
moe.py           router, top-k, the expert dispatches, load-balancing loss
transformer.py   Block, the layer stack (scanned or per layer), embed and head; `forward` -> Output
layer_layout.py  the two layer layouts and converting between them
"""
