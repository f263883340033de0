"""The engine-owned calibration pipeline: what a calibrating stage declares (``stage``), the one runner that executes
every stage's work over the calibration windows, layer by layer (``runner``), which stages share a pass
(``groups``), the windows (``windows``), what a function stage reads (``context``) and the run plan (``plan``)."""
