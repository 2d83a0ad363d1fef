"""Flax Linen models: pure functions of (params, inputs) with logical axis names on every kernel."""
