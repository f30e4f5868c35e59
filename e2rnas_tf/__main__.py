from e2rnas_tf.cli import run

run()
