"""Core utilities: typed configuration, errors, seeding, tensor-dict math and safe file I/O."""
