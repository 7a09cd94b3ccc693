"""Benchmarks: loader, training step and serving throughput, and `skinml bench gpu`."""
