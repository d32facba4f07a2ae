"""quantkit.kernels"""
