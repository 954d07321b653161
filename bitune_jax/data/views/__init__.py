"""Training views, made on the accelerator from uint8 cache images: `crop`, `colour`,
`augment` (reference and MoCo v2 views), `randaugment` and `weak_strong` (FixMatch's
views), `cutmix`, and `batch` (every example's view of a batch, keyed by its row)."""
