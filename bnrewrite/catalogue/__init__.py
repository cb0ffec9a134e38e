"""The texts of every diagnostic code, one module per family; ``bnrewrite.codes`` looks them up."""
