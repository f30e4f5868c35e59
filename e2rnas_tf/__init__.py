"""e2rnas_tf: E2RNAS (Effective, Efficient and Robust NAS) in Keras 3 / TF 2.

Reference:
    Yue, Lin, Huang, Zhang. Effective, Efficient and Robust Neural
    Architecture Search. https://arxiv.org/abs/2011.09820
"""

__version__ = "0.1.0"
