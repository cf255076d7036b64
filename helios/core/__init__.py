"""The paper's math, torch only: history layout and relative indices, Frame-Aware Corrupt, flow matching,
pyramid endpoints and renoising, DMD, GAN losses and approximate R1."""
