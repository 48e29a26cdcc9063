"""Calibration sets and self traces; installed as r1v_quant.calib."""
