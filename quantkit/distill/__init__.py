"""quantkit.distill"""
