"""From CAMs to labels: affinity refinement (CAA, RFM, box masks), PAR, the dense CRF and the
pseudo-label stage."""
