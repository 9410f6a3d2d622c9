"""Self-play curation: candidates, scores, preference pairs (the paper's Eq. 10 update), rounds."""
