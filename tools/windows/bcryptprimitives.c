/* A stand-in for Windows' bcryptprimitives.dll under Wine 8 (Debian 12), which lacks it: Rust's
 * standard library imports its ProcessPrng for random bytes. Built by tools/test-windows into the
 * Wine prefix only; Windows itself has the real one. Same contract: fill `len` bytes, TRUE. */
#include <windows.h>

BOOLEAN WINAPI SystemFunction036(PVOID buffer, ULONG len); /* RtlGenRandom, advapi32 */

__declspec(dllexport) BOOL WINAPI ProcessPrng(PBYTE data, SIZE_T len) {
    while (len) {
        ULONG n = len > 0x10000000 ? 0x10000000 : (ULONG)len;
        if (!SystemFunction036(data, n)) return FALSE;
        data += n;
        len -= n;
    }
    return TRUE;
}
