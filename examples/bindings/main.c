/* Run a qcompiler-compiled model with ONNX Runtime's C API (CPU).
 *
 *   cc -std=c11 -O2 main.c -I"$ORT/include" -L"$ORT/lib" -lonnxruntime -Wl,-rpath,"$ORT/lib" -o main_c
 *   ./main_c model.q.onnx [threads]
 *
 * Feeds the model's first input (float32; dynamic dimensions set to 1) with x[i] = ((i % 17) - 8) / 8 and prints
 * each output's name, shape and values, one value a line (%.9g, so a float32 round-trips). Linux/macOS: on
 * Windows ORTCHAR_T is wchar_t and the model path must be a wide string.
 */
#include <stdio.h>
#include <stdlib.h>

#include <onnxruntime_c_api.h>

static const OrtApi *ort;

static void check(OrtStatus *status) {
  if (status != NULL) {
    fprintf(stderr, "onnxruntime: %s\n", ort->GetErrorMessage(status));
    ort->ReleaseStatus(status);
    exit(1);
  }
}

int main(int argc, char **argv) {
  if (argc < 2) {
    fprintf(stderr, "usage: %s model.onnx [threads]\n", argv[0]);
    return 2;
  }
  int threads = argc > 2 ? atoi(argv[2]) : 1;
  /* NULL when the library is older than this header: build against the headers of the library you ship. */
  ort = OrtGetApiBase()->GetApi(ORT_API_VERSION);
  if (ort == NULL) {
    fprintf(stderr, "libonnxruntime %s is older than this header (API %d)\n", OrtGetApiBase()->GetVersionString(),
            ORT_API_VERSION);
    return 1;
  }

  OrtEnv *env;
  check(ort->CreateEnv(ORT_LOGGING_LEVEL_WARNING, "qcompiler", &env));
  OrtSessionOptions *options;
  check(ort->CreateSessionOptions(&options));
  check(ort->SetIntraOpNumThreads(options, threads));  /* threads inside one op (0: one per physical core) */
  check(ort->SetInterOpNumThreads(options, 1));        /* threads across ops (used in ORT_PARALLEL mode only) */
  check(ort->SetSessionExecutionMode(options, ORT_SEQUENTIAL));
  check(ort->SetSessionGraphOptimizationLevel(options, ORT_ENABLE_ALL));
  check(ort->AddSessionConfigEntry(options, "session.intra_op.allow_spinning", "0"));  /* idle threads sleep */
  OrtSession *session;
  check(ort->CreateSession(env, argv[1], options, &session));

  OrtAllocator *allocator;
  check(ort->GetAllocatorWithDefaultOptions(&allocator));
  char *input_name;
  check(ort->SessionGetInputName(session, 0, allocator, &input_name));
  OrtTypeInfo *type_info;
  check(ort->SessionGetInputTypeInfo(session, 0, &type_info));
  const OrtTensorTypeAndShapeInfo *input_info;
  check(ort->CastTypeInfoToTensorInfo(type_info, &input_info));
  ONNXTensorElementDataType input_type;
  check(ort->GetTensorElementType(input_info, &input_type));
  if (input_type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT) {
    fprintf(stderr, "input %s is not float32\n", input_name);
    return 1;
  }
  size_t rank;
  check(ort->GetDimensionsCount(input_info, &rank));
  int64_t shape[16];
  if (rank > 16) return 1;
  check(ort->GetDimensions(input_info, shape, rank));
  size_t count = 1;
  for (size_t d = 0; d < rank; ++d) {
    if (shape[d] <= 0) shape[d] = 1; /* a dynamic dimension (-1) */
    count *= (size_t)shape[d];
  }
  ort->ReleaseTypeInfo(type_info);

  float *data = malloc(count * sizeof(float));
  for (size_t i = 0; i < count; ++i) data[i] = (float)((int)(i % 17) - 8) / 8.0f;
  OrtMemoryInfo *memory_info;
  check(ort->CreateCpuMemoryInfo(OrtArenaAllocator, OrtMemTypeDefault, &memory_info));
  OrtValue *input = NULL;  /* wraps `data` without copying it */
  check(ort->CreateTensorWithDataAsOrtValue(memory_info, data, count * sizeof(float), shape, rank,
                                            ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, &input));

  size_t n_outputs;
  check(ort->SessionGetOutputCount(session, &n_outputs));
  char **output_names = malloc(n_outputs * sizeof(char *));
  OrtValue **outputs = calloc(n_outputs, sizeof(OrtValue *));
  for (size_t k = 0; k < n_outputs; ++k) check(ort->SessionGetOutputName(session, k, allocator, &output_names[k]));
  const char *input_names[] = {input_name};
  check(ort->Run(session, NULL, input_names, (const OrtValue *const *)&input, 1,
                 (const char *const *)output_names, n_outputs, outputs));

  for (size_t k = 0; k < n_outputs; ++k) {
    OrtTensorTypeAndShapeInfo *info;
    check(ort->GetTensorTypeAndShape(outputs[k], &info));
    ONNXTensorElementDataType type;
    check(ort->GetTensorElementType(info, &type));
    size_t out_rank, out_count;
    check(ort->GetDimensionsCount(info, &out_rank));
    int64_t out_shape[16];
    if (out_rank > 16) return 1;
    check(ort->GetDimensions(info, out_shape, out_rank));
    check(ort->GetTensorShapeElementCount(info, &out_count));
    ort->ReleaseTensorTypeAndShapeInfo(info);
    if (type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT) {
      fprintf(stderr, "output %s is not float32\n", output_names[k]);
      return 1;
    }
    printf("output %s float32 [", output_names[k]);
    for (size_t d = 0; d < out_rank; ++d) printf(d ? ",%lld" : "%lld", (long long)out_shape[d]);
    printf("]\n");
    float *values;
    check(ort->GetTensorMutableData(outputs[k], (void **)&values));
    for (size_t i = 0; i < out_count; ++i) printf("%.9g\n", values[i]);
    ort->ReleaseValue(outputs[k]);
    check(ort->AllocatorFree(allocator, output_names[k]));
  }

  check(ort->AllocatorFree(allocator, input_name));
  ort->ReleaseValue(input);
  ort->ReleaseMemoryInfo(memory_info);
  ort->ReleaseSession(session);
  ort->ReleaseSessionOptions(options);
  ort->ReleaseEnv(env);
  free(outputs);
  free(output_names);
  free(data);
  return 0;
}
