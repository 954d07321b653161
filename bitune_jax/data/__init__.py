"""Data: what a run reads (`spec`: a method's `Needs`, the run's `DataSpec`), its
sources (`digits`, `datasets` over tfds and `builders`), which examples it takes
(`splits`), the uint8 image caches (`decode`, `cache`), the assembled `Input`
(`input`), host batches (`pipeline`) and the views made on the device (`views`)."""
