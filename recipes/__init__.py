"""Shipped recipes, model presets, accelerate configs and principles.

Installed as `posttrain.recipes` so that presets and the demo recipe work from a wheel too.
"""
