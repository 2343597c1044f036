"""Measurements: accuracy and the output-error check (``evaluate``), latency timed side by side
(``latency``), the machine the numbers come from (``environment``), and FID for generators
(``fid``: feature statistics and the Fréchet distance; ``fid_features``: the extractors).

Nothing is imported here: ``fid_features`` pulls in the model loaders and the training loop,
which the latency and evaluation modules must not pay for."""
