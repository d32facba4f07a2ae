"""quantkit.sparsity"""
