"""Low-rank baselines (SVD, ASVD, SVD-LLM): each linear becomes two factors at A³'s parameter budget."""

from a3q.stages.baselines import asvd, svd, svd_llm  # noqa: F401
