"""quantkit.runtime"""
