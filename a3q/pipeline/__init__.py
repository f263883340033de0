"""The engine-owned calibration pipeline: what a calibrating stage declares (``stage``) and the one runner that
executes every stage's work over the calibration windows, layer by layer (``runner``)."""
