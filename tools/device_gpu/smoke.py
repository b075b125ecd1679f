"""GPU smoke test: TensorFlow sees the GPU; a conv/BN step in mixed_float16, eager-graph and XLA; cuBLAS."""
import time
t0 = time.time()
import tensorflow as tf
print("tf", tf.__version__, tf.sysconfig.get_build_info().get("cuda_version"), f"import {time.time()-t0:.1f}s", flush=True)
gpus = tf.config.list_physical_devices("GPU")
print("gpus", gpus, flush=True)
if not gpus:
    raise SystemExit("NO GPU")
tf.config.experimental.set_memory_growth(gpus[0], True)
print(tf.config.experimental.get_device_details(gpus[0]), flush=True)
try:
    a = tf.random.normal([2048, 2048]); print("matmul", float(tf.reduce_sum(tf.matmul(a, a))), f"{time.time()-t0:.1f}s", flush=True)
except Exception as e:  # cuBLAS is linked to the image's CUDA 13 build: a failure here must not hide the conv test
    print("matmul FAILED", type(e).__name__, str(e)[:300], flush=True)
import keras
keras.mixed_precision.set_global_policy("mixed_float16")
x = tf.random.normal([8, 64, 64, 3]); y = tf.cast(tf.random.uniform([8, 64, 64, 1]) > 0.5, tf.float32)
for jit in (False, True):
    m = keras.Sequential([keras.Input((64, 64, 3)), keras.layers.Conv2D(32, 3, padding="same"),
                          keras.layers.BatchNormalization(), keras.layers.ReLU(),
                          keras.layers.Conv2DTranspose(16, 2, strides=1, padding="same"), keras.layers.Conv2D(1, 1),
                          keras.layers.Activation("sigmoid", dtype="float32")])
    m.compile(optimizer=keras.optimizers.Adam(1e-3), loss="binary_crossentropy", jit_compile=jit)
    h = m.fit(x, y, epochs=3, verbose=0)
    print("fit jit", jit, [round(v, 4) for v in h.history["loss"]], type(m.optimizer).__name__, f"{time.time()-t0:.1f}s", flush=True)
print("SMOKE OK", flush=True)
