"""The `awq` command: calibration on a full-precision checkpoint, the layer-by-layer AWQ search, the
memory model that plans it, and the export it writes."""
