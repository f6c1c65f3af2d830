"""TensorRT engines: built on the device, cached under a key that makes a foreign engine impossible to load."""
