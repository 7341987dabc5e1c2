// The GGUF validator: every file is checked here before llama.cpp's loader reads it.
#pragma once

#include "slicemoe.h"

#include <string>

namespace slicemoe {

// SLICEMOE_OK, or SLICEMOE_ERR_FORMAT / SLICEMOE_ERR_IO with *error naming the file and the
// problem: hyperparameters llama.cpp would assert on, tokenizer arrays that do not match the
// vocabulary, tensor data outside the file, slicemoe.* keys or slice tensors a sliced model
// cannot have. Reads the header only.
int validate_file(const char * path, std::string * error);

} // namespace slicemoe
