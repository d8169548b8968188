"""The tune stage: `sweep` (the Tuner over a driver that runs one Train run per trial), `results` (the table, files
and plots of a sweep), `workarounds` (what Ray 2.60 needs patched around, apart)."""
