// Run a qcompiler-compiled model with ONNX Runtime's C++ API (onnxruntime_cxx_api.h, header-only over the C API; CPU).
//
//   c++ -std=c++17 -O2 main.cpp -I"$ORT/include" -L"$ORT/lib" -lonnxruntime -Wl,-rpath,"$ORT/lib" -o main_cpp
//   ./main_cpp model.q.onnx [threads]
//
// Feeds the model's first input (float32; dynamic dimensions set to 1) with x[i] = ((i % 17) - 8) / 8 and prints
// each output's name, shape and values, one value a line (%.9g, so a float32 round-trips). Linux/macOS: on
// Windows the model path is a wide string (ORTCHAR_T).
#include <cstdio>
#include <cstdlib>
#include <vector>

#include <onnxruntime_cxx_api.h>

int main(int argc, char** argv) {
  if (argc < 2) {
    std::fprintf(stderr, "usage: %s model.onnx [threads]\n", argv[0]);
    return 2;
  }
  const int threads = argc > 2 ? std::atoi(argv[2]) : 1;
  try {
    Ort::Env env(ORT_LOGGING_LEVEL_WARNING, "qcompiler");
    Ort::SessionOptions options;
    options.SetIntraOpNumThreads(threads);  // threads inside one op (0: one per physical core)
    options.SetInterOpNumThreads(1);        // threads across ops (used in ORT_PARALLEL mode only)
    options.SetExecutionMode(ExecutionMode::ORT_SEQUENTIAL);
    options.SetGraphOptimizationLevel(GraphOptimizationLevel::ORT_ENABLE_ALL);
    options.AddConfigEntry("session.intra_op.allow_spinning", "0");  // idle threads sleep instead of spinning
    Ort::Session session(env, argv[1], options);

    Ort::AllocatorWithDefaultOptions allocator;
    Ort::AllocatedStringPtr input_name = session.GetInputNameAllocated(0, allocator);
    Ort::TypeInfo type_info = session.GetInputTypeInfo(0);  // keep it alive: the tensor info below points into it
    auto input_info = type_info.GetTensorTypeAndShapeInfo();
    if (input_info.GetElementType() != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT) {
      std::fprintf(stderr, "input %s is not float32\n", input_name.get());
      return 1;
    }
    std::vector<int64_t> shape = input_info.GetShape();
    size_t count = 1;
    for (int64_t& d : shape) {
      if (d <= 0) d = 1;  // a dynamic dimension (-1)
      count *= static_cast<size_t>(d);
    }
    std::vector<float> data(count);
    for (size_t i = 0; i < count; ++i) data[i] = static_cast<float>(static_cast<int>(i % 17) - 8) / 8.0f;

    auto memory_info = Ort::MemoryInfo::CreateCpu(OrtArenaAllocator, OrtMemTypeDefault);
    // Wraps `data` without copying it.
    Ort::Value input = Ort::Value::CreateTensor<float>(memory_info, data.data(), data.size(), shape.data(),
                                                       shape.size());

    std::vector<Ort::AllocatedStringPtr> output_name_ptrs;
    std::vector<const char*> output_names;
    for (size_t k = 0; k < session.GetOutputCount(); ++k) {
      output_name_ptrs.push_back(session.GetOutputNameAllocated(k, allocator));
      output_names.push_back(output_name_ptrs.back().get());
    }
    const char* input_names[] = {input_name.get()};
    std::vector<Ort::Value> outputs = session.Run(Ort::RunOptions{nullptr}, input_names, &input, 1,
                                                  output_names.data(), output_names.size());

    for (size_t k = 0; k < outputs.size(); ++k) {
      auto info = outputs[k].GetTensorTypeAndShapeInfo();
      if (info.GetElementType() != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT) {
        std::fprintf(stderr, "output %s is not float32\n", output_names[k]);
        return 1;
      }
      std::printf("output %s float32 [", output_names[k]);
      const std::vector<int64_t> out_shape = info.GetShape();
      for (size_t d = 0; d < out_shape.size(); ++d) std::printf(d ? ",%lld" : "%lld", (long long)out_shape[d]);
      std::printf("]\n");
      const float* values = outputs[k].GetTensorData<float>();
      for (size_t i = 0; i < info.GetElementCount(); ++i) std::printf("%.9g\n", values[i]);
    }
  } catch (const Ort::Exception& e) {
    std::fprintf(stderr, "onnxruntime: %s\n", e.what());
    return 1;
  }
  return 0;
}
