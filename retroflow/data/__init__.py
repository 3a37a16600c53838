"""The `data` stage and the dataset readers every stage uses: BEIR (`beir`), MS MARCO
(`msmarco`) and Natural Questions in DPR format (`nq`), each normalised once to Parquet."""
