"""e2rnas_tf: E2RNAS (Effective, Efficient and Robust NAS) in Keras 3 / TF 2.

Importing the package registers its Keras layers and models (the candidate
ops, the search space, the fused cell and the derived network) with Keras'
serialisation, so a model written by ``e2rnas train`` loads anywhere with

    import e2rnas_tf, keras
    model = keras.saving.load_model("runs/train/model_best.keras")

It imports TensorFlow and Keras (what the layers need) and nothing heavier:
plotting, TFDS, cleverhans and the CLI load only when used.

Reference:
    Yue, Lin, Huang, Zhang. Effective, Efficient and Robust Neural
    Architecture Search. https://arxiv.org/abs/2011.09820
"""

__version__ = "0.1.0"

# TensorFlow's native start-up lines (INFO records) are dropped from stderr
# during its import, without touching the environment (tf_startup).
from e2rnas_tf import tf_startup  # noqa: E402

tf_startup.import_tensorflow_quietly()

# Keras rebuilds a custom class of a .keras file only if the class was
# registered (`register_keras_serializable`) in this process, which happens
# when its module is imported. These modules hold every serialisable class
# of the package and depend only on keras, tensorflow and numpy.
from e2rnas_tf.space import (
    fused_cell,  # noqa: E402,F401
    model,  # noqa: E402,F401
    ops,  # noqa: E402,F401
    search_space,  # noqa: E402,F401
)
