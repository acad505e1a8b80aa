/*
 * Training and text generation from C: create a small byte-level model from the `tiny` preset
 * with TOML overrides, train it for a few dozen steps on a text held in memory, check that the
 * held-out loss fell, save a checkpoint, load it back as a model, check that the model scores the
 * text as the trainer did, and generate a continuation (greedy, then sampled with a seed).
 * Uses the first CUDA GPU when there is one, else the CPU.
 */
/* mkdtemp and nftw, for the scratch checkpoint directory. */
#define _XOPEN_SOURCE 700
#include <ftw.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <tessera.h>

#define TRY(call)                                                                                  \
    do {                                                                                           \
        TesseraStatus status_ = (call);                                                            \
        if (status_ != TESSERA_STATUS_OK) {                                                        \
            fprintf(stderr, "%s failed: %s: %s\n", #call, tessera_status_name(status_),            \
                    tessera_last_error());                                                         \
            exit(1);                                                                               \
        }                                                                                          \
    } while (0)

static const char *const CONFIG =
    "[model]\n"
    "layers = 1\nheads = 2\nkv_heads = 2\nwidth = 32\nffn_width = 64\ncontext = 16\n"
    "[train]\n"
    "batch = 4\nseq = 16\nsteps = 30\nwarmup = 4\nlr = 0.02\nmin_lr = 0.001\n";

static const char *const TEXT = "the cat sat on the mat. the dog sat on the log. ";

enum { TEXT_REPEATS = 24, STEPS = 30, SEQ = 16, GENERATED = 48 };

static int remove_entry(const char *path, const struct stat *info, int flag, struct FTW *ftw) {
    (void)info;
    (void)flag;
    (void)ftw;
    return remove(path);
}

int main(void) {
    TesseraDevice *device = NULL;
    if (tessera_device_new_cuda(0, &device) != TESSERA_STATUS_OK) {
        printf("no GPU (%s): running on the CPU\n", tessera_last_error());
        TRY(tessera_device_new_cpu(&device));
    }

    /* The text as byte tokens: the model's vocabulary is the 256 byte values. */
    size_t length = strlen(TEXT), count = length * TEXT_REPEATS;
    uint32_t *tokens = malloc(count * sizeof(uint32_t));
    if (tokens == NULL) return 1;
    for (size_t i = 0; i < count; i++) tokens[i] = (unsigned char)TEXT[i % length];
    /* Training windows come from the first three quarters, validation from the rest. */
    size_t train_count = count * 3 / 4;

    TesseraTrainer *trainer = NULL;
    TRY(tessera_trainer_new(device, "tiny", CONFIG, NULL, &trainer));
    TesseraModelInfo info;
    TRY(tessera_trainer_info(trainer, &info, NULL));
    printf("model: %zu layers, width %zu, %zu parameters\n", info.layers, info.width, info.parameters);

    float before = 0, after = 0;
    TRY(tessera_trainer_validate_tokens(trainer, tokens + train_count, count - train_count, &before));
    TesseraStepRecord record;
    TRY(tessera_trainer_train_tokens(trainer, tokens, train_count, STEPS, &record));
    TRY(tessera_trainer_validate_tokens(trainer, tokens + train_count, count - train_count, &after));
    printf("step %llu: training loss %.3f, validation loss %.3f -> %.3f nats/token\n",
           (unsigned long long)record.step, record.loss, before, after);
    /* From about ln(256) = 5.5 untrained to well under half that. */
    int ok = record.step == STEPS && isfinite(after) && after < 0.5f * before;

    char dir[] = "/tmp/tessera-example-XXXXXX";
    if (mkdtemp(dir) == NULL) return 1;
    TRY(tessera_trainer_save(trainer, dir));

    /* The saved checkpoint, loaded as a model, scores one window as the trainer does. */
    TesseraModel *model = NULL;
    TRY(tessera_model_load(device, dir, NULL, &model));
    float trainer_loss = 0, model_loss = 0;
    const uint32_t *window = tokens + train_count;
    TRY(tessera_trainer_validate_tokens(trainer, window, SEQ + 1, &trainer_loss));
    TRY(tessera_model_loss(model, window, window + 1, 1, SEQ, &model_loss));
    ok &= fabsf(model_loss - trainer_loss) <= 1e-5f * (1.0f + trainer_loss);

    uint32_t prompt[4] = {'t', 'h', 'e', ' '};
    uint32_t generated[GENERATED];
    char text[GENERATED + 1];
    TRY(tessera_model_generate(model, prompt, 4, GENERATED, NULL, 0, generated));
    for (size_t i = 0; i < GENERATED; i++) text[i] = generated[i] < 128 && generated[i] >= 32 ? (char)generated[i] : '?';
    text[GENERATED] = '\0';
    printf("greedy:  \"the %s\"\n", text);
    /* Greedy decoding ignores the seed. */
    uint32_t again[GENERATED];
    TRY(tessera_model_generate(model, prompt, 4, GENERATED, NULL, 12345, again));
    ok &= memcmp(generated, again, sizeof again) == 0;

    TesseraSampling sampling = tessera_sampling_default();
    sampling.temperature = 0.8f;
    sampling.top_k = 10;
    sampling.top_p = 0.95f;
    TRY(tessera_model_generate(model, prompt, 4, GENERATED, &sampling, 7, generated));
    for (size_t i = 0; i < GENERATED; i++) {
        ok &= generated[i] < info.vocab;
        text[i] = generated[i] < 128 && generated[i] >= 32 ? (char)generated[i] : '?';
    }
    printf("sampled: \"the %s\"\n", text);

    TRY(tessera_model_free(model));
    TRY(tessera_trainer_free(trainer));
    TRY(tessera_device_free(device));
    free(tokens);
    nftw(dir, remove_entry, 8, FTW_DEPTH | FTW_PHYS);
    ok &= tessera_live_handle_count() == 0;
    printf("train.c: %s\n", ok ? "ok" : "FAILED");
    return ok ? 0 : 1;
}
