"""Low-rank baselines (SVD, ASVD, SVD-LLM): each linear becomes two factors at A³'s parameter budget."""
