"""Images: bytes -> 8-bit RGB -> the model's input size, priced before decoding. `decode`, `jpeg`,
`budget` and `recipe` need no torch (front-end processes run them); `device_resize` is the recipe in
torch, what the engine process runs (on a GPU, or on a CPU as each image arrives)."""
