"""Measurements: accuracy and the output-error check (``evaluate``), latency timed side by side
(``latency``), and the machine the numbers come from (``environment``)."""
