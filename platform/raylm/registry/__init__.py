"""The model registry: `store` (versions, their files and manifests; knows no stage), `aliases` (`latest`, `best`
and promotions), `gate` (whether a new version may become `best`), `register` (the `raylm register` stage)."""
