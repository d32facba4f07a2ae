"""quantkit.server"""
