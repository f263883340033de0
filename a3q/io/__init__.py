"""Loading models into ModelGraphs and writing/reading a3q artifacts."""
