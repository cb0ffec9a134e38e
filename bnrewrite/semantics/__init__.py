"""What a captured node computes: conv/linear layers, BatchNorm and per-channel affine sites,
per-sample norms, linear ops and reshapes, which users read a value (and which only its shape),
and the algebra of folding a per-channel affine into a layer (``fold_math``, ``branch_math``).
Nothing here edits a graph or a model."""
