"""fedmeta: personalization-focused federated meta-learning.

Flower runs federated rounds of Reptile or MAML-family meta-learning over a
model with a shared body and one head per task; each site then adapts the
resulting base model with a few shots of its own data.
"""

__version__ = "0.1.0"
