"""The r1v-quant command line; installed as r1v_quant.cli."""
