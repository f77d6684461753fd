// A coverage-guided fuzzing loop for LLVMFuzzerTestOneInput targets, for compilers without
// libFuzzer (GCC). kvggml's sources are built with -fsanitize-coverage=trace-pc (the `fuzz`
// build, scripts/vendor.py): every basic block they run calls __sanitizer_cov_trace_pc below,
// which counts the edge (previous block, this block) in a map, AFL-style. An input that reaches
// a new edge, or an edge's new hit-count bucket, joins the corpus; mutations of the corpus make
// the next inputs. AddressSanitizer and UBSan turn a memory error or undefined behaviour into a
// crash, and the input that caused it is written to a file first.
//
//     fuzz-TARGET [-max_total_time=S] [-runs=N] [-seed=N] [-artifact_prefix=DIR/] CORPUS_DIR...
//     fuzz-TARGET FILE...            run each file once (regressions); exit 0 if none crashes
//
// libFuzzer's flag names, so a target also links against libFuzzer unchanged (-fsanitize=fuzzer).
// Progress goes to stderr; the last line on stdout is a JSON summary.

#include <sanitizer/common_interface_defs.h>
#include <sys/stat.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <dirent.h>
#include <fstream>
#include <iterator>
#include <memory>
#include <random>
#include <string>
#include <vector>

extern "C" int LLVMFuzzerTestOneInput(const uint8_t * data, size_t size);
extern "C" int LLVMFuzzerInitialize(int * argc, char *** argv);

namespace {

constexpr size_t kMapSize = 1 << 16;
constexpr size_t kMaxInput = 4 << 20;  // saved states of the state target reach 2 MB
uint8_t hits[kMapSize];          // this run's hit count per edge, saturating
uint8_t seen_buckets[kMapSize];  // every hit-count bucket any input reached, one bit each
thread_local uintptr_t previous_block;

using Bytes = std::vector<uint8_t>;
Bytes current;  // the input running now: written out if it crashes
std::string crash_path;

// AFL's buckets: 1, 2, 3, 4-7, 8-15, 16-31, 32-127, 128+ hits are different behaviours.
uint8_t bucket(uint8_t n) {
    return n == 0 ? 0 : n < 4 ? (uint8_t) (1u << (n - 1)) : n < 8 ? 8 : n < 16 ? 16 : n < 32 ? 32 : n < 128 ? 64 : 128;
}

uint64_t fnv(const Bytes & b) {
    uint64_t h = 0xcbf29ce484222325ull;
    for (uint8_t c : b) {
        h = (h ^ c) * 0x100000001b3ull;
    }
    return h;
}

bool write_file(const std::string & path, const Bytes & b) {
    FILE * f = std::fopen(path.c_str(), "wb");
    if (f == nullptr) {
        return false;
    }
    const bool ok = std::fwrite(b.data(), 1, b.size(), f) == b.size();
    return std::fclose(f) == 0 && ok;
}

Bytes read_file(const std::string & path) {
    std::ifstream in(path, std::ios::binary);
    return Bytes(std::istreambuf_iterator<char>(in), {});
}

bool is_dir(const std::string & path) {
    struct stat st;
    return stat(path.c_str(), &st) == 0 && S_ISDIR(st.st_mode);
}

std::vector<std::string> files_in(const std::string & dir) {
    std::vector<std::string> out;
    if (DIR * d = opendir(dir.c_str())) {
        while (const dirent * e = readdir(d)) {
            const std::string path = dir + "/" + e->d_name;
            if (e->d_name[0] != '.' && !is_dir(path)) {
                out.push_back(path);
            }
        }
        closedir(d);
    }
    std::sort(out.begin(), out.end());
    return out;
}

// Called by the sanitizers before they abort: keep the input that did it.
void save_crash() {
    const std::string path = crash_path + "crash-" + std::to_string(fnv(current));
    if (write_file(path, current)) {
        std::fprintf(stderr, "fuzz: the input that crashed is %s (%zu bytes)\n", path.c_str(), current.size());
    }
}

// Runs one input; true when it reached an edge or a hit-count bucket no earlier input did.
bool run_one(const Bytes & input) {
    current = input;
    std::memset(hits, 0, sizeof(hits));
    previous_block = 0;
    // an allocation of exactly the input's size, so AddressSanitizer sees a read one byte past it
    const std::unique_ptr<uint8_t[]> exact(new uint8_t[input.size()]);
    std::copy(input.begin(), input.end(), exact.get());
    LLVMFuzzerTestOneInput(exact.get(), input.size());
    bool fresh = false;
    for (size_t i = 0; i < kMapSize; ++i) {
        const uint8_t b = bucket(hits[i]);
        if (b & ~seen_buckets[i]) {
            seen_buckets[i] |= b;
            fresh = true;
        }
    }
    return fresh;
}

size_t edges_covered() {
    return (size_t) std::count_if(seen_buckets, seen_buckets + kMapSize, [](uint8_t b) { return b != 0; });
}

// Values that sit on boundaries of sizes, counts and widths.
const uint32_t kInteresting[] = {0, 1, 2, 7, 8, 15, 16, 17, 31, 32, 63, 64, 127, 128, 255, 256, 4096, 32767, 32768,
                                 65535, 65536, 0x7fffffff, 0x80000000u, 0xffffffffu};

Bytes mutate(const Bytes & base, const std::vector<Bytes> & corpus, std::mt19937_64 & rng) {
    Bytes b = base;
    const auto pick = [&](size_t n) { return n == 0 ? 0 : (size_t) (rng() % n); };
    const int n_changes = 1 + (int) pick(6);
    for (int i = 0; i < n_changes; ++i) {
        const size_t at = pick(b.size());
        switch (pick(b.empty() ? 1 : 9)) {
            case 0: {  // insert random bytes
                const size_t n = 1 + pick(8);
                for (size_t k = 0; k < n; ++k) {
                    b.insert(b.begin() + (ptrdiff_t) std::min(at, b.size()), (uint8_t) rng());
                }
                break;
            }
            case 1: b[at] ^= (uint8_t) (1u << pick(8)); break;
            case 2: b[at] = (uint8_t) rng(); break;
            case 3: {  // erase a range
                const size_t n = std::min(b.size() - at, 1 + pick(16));
                b.erase(b.begin() + (ptrdiff_t) at, b.begin() + (ptrdiff_t) (at + n));
                break;
            }
            case 4: {  // a boundary value, little-endian, 1 to 4 bytes wide
                const uint32_t v = kInteresting[pick(std::size(kInteresting))];
                const size_t width = std::min<size_t>(1 + pick(4), b.size() - at);
                std::memcpy(b.data() + at, &v, width);
                break;
            }
            case 5: {  // add or subtract a little, as a 4-byte word
                uint32_t v = 0;
                const size_t width = std::min<size_t>(4, b.size() - at);
                std::memcpy(&v, b.data() + at, width);
                v += (uint32_t) pick(33) - 16;
                std::memcpy(b.data() + at, &v, width);
                break;
            }
            case 6: {  // copy a range of this input elsewhere in it
                const size_t from = pick(b.size()), n = std::min(b.size() - std::max(from, at), 1 + pick(64));
                std::memmove(b.data() + at, b.data() + from, n);
                break;
            }
            case 7: b.resize(at); break;  // truncate: every parser's first defect
            default: {  // splice: this input's head, another's tail
                const Bytes & other = corpus[pick(corpus.size())];
                const size_t cut = pick(other.size());
                b.resize(std::min(at, b.size()));
                b.insert(b.end(), other.begin() + (ptrdiff_t) cut, other.end());
                break;
            }
        }
        if (b.size() > kMaxInput) {
            b.resize(kMaxInput);
        }
    }
    return b;
}

struct Options {
    double max_total_time = 0;  // seconds; 0: no limit
    uint64_t runs = 0;          // inputs; 0: no limit
    uint64_t seed = 1;
    std::vector<std::string> paths;
};

Options parse(int argc, char ** argv) {
    Options o;
    for (int i = 1; i < argc; ++i) {
        const std::string a = argv[i];
        const auto value = [&](const char * flag) -> const char * {
            const size_t n = std::strlen(flag);
            return a.compare(0, n, flag) == 0 ? a.c_str() + n : nullptr;
        };
        if (const char * v = value("-max_total_time=")) {
            o.max_total_time = std::atof(v);
        } else if (const char * v = value("-runs=")) {
            o.runs = std::strtoull(v, nullptr, 10);
        } else if (const char * v = value("-seed=")) {
            o.seed = std::strtoull(v, nullptr, 10);
        } else if (const char * v = value("-artifact_prefix=")) {
            crash_path = v;
        } else if (a[0] == '-') {
            std::fprintf(stderr, "fuzz: unknown flag %s: expected -max_total_time=S, -runs=N, -seed=N or "
                                 "-artifact_prefix=DIR/\n", a.c_str());
            std::exit(2);
        } else {
            o.paths.push_back(a);
        }
    }
    return o;
}

}  // namespace

extern "C" __attribute__((no_sanitize("address", "undefined"))) void __sanitizer_cov_trace_pc() {
    const uintptr_t block = (uintptr_t) __builtin_return_address(0);
    uint8_t & h = hits[(block ^ previous_block) % kMapSize];
    h += h != 255;
    previous_block = block >> 1;
}

int main(int argc, char ** argv) {
    const Options opt = parse(argc, argv);
    if (opt.paths.empty()) {
        std::fprintf(stderr, "usage: %s [-max_total_time=S] [-runs=N] [-seed=N] [-artifact_prefix=DIR/] "
                             "CORPUS_DIR... | FILE...\n", argv[0]);
        return 2;
    }
    __sanitizer_set_death_callback(save_crash);
    LLVMFuzzerInitialize(&argc, &argv);

    if (!is_dir(opt.paths.front())) {  // regression mode: each file once
        for (const std::string & path : opt.paths) {
            run_one(read_file(path));
            std::fprintf(stderr, "fuzz: %s: no crash\n", path.c_str());
        }
        std::printf("{\"files\": %zu, \"crashes\": 0}\n", opt.paths.size());
        return 0;
    }

    // The first directory keeps what the run finds; all of them seed it.
    const std::string & out_dir = opt.paths.front();
    std::vector<Bytes> corpus;
    for (const std::string & dir : opt.paths) {
        for (const std::string & path : files_in(dir)) {
            Bytes b = read_file(path);
            if (run_one(b) || corpus.empty()) {
                corpus.push_back(std::move(b));
            }
        }
    }
    if (corpus.empty()) {
        corpus.push_back({});
        run_one(corpus.back());
    }
    const size_t seeds = corpus.size();
    std::fprintf(stderr, "fuzz: %zu seed inputs kept, %zu edges\n", seeds, edges_covered());

    std::mt19937_64 rng(opt.seed);
    const auto start = std::chrono::steady_clock::now();
    const auto elapsed = [&] { return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count(); };
    uint64_t execs = 0;
    double last_report = 0;
    while ((opt.runs == 0 || execs < opt.runs) && (opt.max_total_time == 0 || elapsed() < opt.max_total_time)) {
        Bytes input = mutate(corpus[rng() % corpus.size()], corpus, rng);
        ++execs;
        if (run_one(input)) {
            write_file(out_dir + "/" + std::to_string(fnv(input)), input);
            corpus.push_back(std::move(input));
        }
        if (elapsed() - last_report >= 10) {
            last_report = elapsed();
            std::fprintf(stderr, "fuzz: %.0f s, %llu execs (%.0f/s), %zu edges, corpus %zu\n", last_report,
                         (unsigned long long) execs, execs / last_report, edges_covered(), corpus.size());
        }
    }
    std::printf("{\"execs\": %llu, \"seconds\": %.1f, \"edges\": %zu, \"seed_inputs\": %zu, \"corpus\": %zu, "
                "\"crashes\": 0}\n",
                (unsigned long long) execs, elapsed(), edges_covered(), seeds, corpus.size());
    return 0;
}
