"""Images: bytes -> 8-bit RGB -> the model's input size, priced before decoding. `decode`, `budget`
and `recipe` need no torch (front-end processes run them); `device_resize` is the recipe on a GPU."""
