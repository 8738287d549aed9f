# Derivations instantiated by derivation_test.go with
#   nix-instantiate --store <tmp root> testdata/drvs.nix
# Nothing is built: the builder is /bin/busybox and there are no sources
# other than builtins.toFile texts.
let
  mk = attrs: builtins.derivation ({
    system = "x86_64-linux";
    builder = "/bin/busybox";
    args = [ "sh" "-c" "echo hi > $out" ];
  } // attrs);
  h = algo: s: builtins.hashString algo s;
  fFlat = mk { name = "fixed-flat"; outputHashMode = "flat"; outputHashAlgo = "sha256"; outputHash = h "sha256" "flat"; };
  # Same output as fFlat, built differently: same hash modulo, so a
  # dependent sees both merged under one key.
  fSame = mk { name = "fixed-flat"; outputHashMode = "flat"; outputHashAlgo = "sha256"; outputHash = h "sha256" "flat"; args = [ "other" ]; };
  fRec = mk { name = "fixed-rec"; outputHashMode = "recursive"; outputHashAlgo = "sha256"; outputHash = h "sha256" "rec"; };
  fSha1 = mk { name = "fixed-sha1"; outputHashAlgo = "sha1"; outputHash = h "sha1" "one"; };
  fSha512 = mk { name = "fixed-sha512"; outputHashMode = "recursive"; outputHashAlgo = "sha512"; outputHash = h "sha512" "five"; dep = fRec; };
  fMd5 = mk { name = "fixed-md5"; outputHashAlgo = "md5"; outputHash = h "md5" "m"; };
  multi = mk { name = "multi"; outputs = [ "out" "dev" "lib" ]; dep = fFlat; };
  c1 = mk { name = "c1"; x = multi.dev; y = multi.lib; z = fRec; a = fSame; b = fFlat; };
  c2 = mk {
    name = "c2";
    x = c1;
    m = multi;
    s = builtins.toFile "s.txt" "src";
    args = [ "sh" "-c" "echo \"quoted\\ \n\ttab\r $x" "" ];
    weird = "a\"b\\c\nd\re\tf ünïcode";
    empty = "";
  };
in { inherit fFlat fSame fRec fSha1 fSha512 fMd5 multi c1 c2; }
