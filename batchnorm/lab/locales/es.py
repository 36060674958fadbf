"""Textos del laboratorio en español. Claves y marcadores: ``batchnorm/lab/locales/__init__.py``.

Los términos, como en el curso: normalización por lotes (*batch
normalization*, BN), media, varianza, tasa de aprendizaje, época, tamaño de
lote, precisión (*accuracy*), pérdida (*loss*), paso de entrenamiento, conjunto
de validación, modo de entrenamiento / modo de inferencia (evaluación),
estadísticas móviles (*running statistics*). Los nombres propios de capas
(ReLU, GroupNorm, LayerNorm) y de código (``model.eval()``) no se traducen.
"""

MESSAGES = {
    # ---------------------------------------------------------------- ejecuciones y series
    "label.bn": "BN",
    "label.no_bn": "sin BN",
    "label.bn_after_relu": "BN después de la ReLU",
    "label.bn_before_relu": "BN antes de la ReLU",
    "label.groupnorm": "GroupNorm",
    "label.layernorm": "LayerNorm",
    "label.renorm": "Batch Renorm",
    "label.ghost": "BN fantasma (8)",
    "label.bn_network": "red con BN",
    "run.batch_size": "{label} lote={batch_size}",
    "run.lr": "{label} tasa={lr}",
    "run.init": "{label} x{scale:g}",
    "series.train": "{label} (entrenamiento)",
    "series.validation": "{label} (validación)",
    "value.yes": "sí",
    "value.no": "no",
    # ---------------------------------------------------------------- columnas del resumen
    "col.run": "modelo",
    "col.norm": "normalización",
    "col.condition": "condición",
    "col.batch_size": "tamaño de lote",
    "col.lr": "tasa de aprendizaje",
    "col.weight_scale": "escala de los pesos",
    "col.steps": "pasos",
    "col.final_val_acc": "precisión final (val.)",
    "col.best_val_acc": "mejor precisión (val.)",
    "col.val_acc": "precisión (val.)",
    "col.train_acc": "precisión (entren.)",
    "col.acc_gap": "brecha de precisión (entren. - val.)",
    "col.final_test_acc": "precisión final (prueba)",
    "col.acc_at": "precisión a {thousands}k pasos",
    "col.steps_to": "pasos hasta {target:.0%}",
    "col.final_train_loss": "pérdida final (entren.)",
    "col.final_val_loss": "pérdida final (val.)",
    "col.train_seconds": "segundos (entren.)",
    "col.diverged": "divergió",
    "col.median_drift": "deriva de la mediana",
    # ---------------------------------------------------------------- gráficas
    "curves.title": "Curvas de entrenamiento",
    "panel.loss": "Pérdida",
    "panel.accuracy": "Precisión",
    "panel.val_accuracy": "Precisión en validación",
    "panel.test_accuracy": "Precisión en prueba",
    "axis.step": "paso de entrenamiento",
    "axis.loss": "pérdida (entropía cruzada)",
    "axis.accuracy": "precisión",
    "axis.val_accuracy": "precisión en validación",
    "axis.batch_size": "tamaño de lote",
    "axis.lr": "tasa de aprendizaje (SGD, momento 0.9)",
    "axis.weight_scale": "factor de escala de los pesos",
    "axis.preactivation": "valor antes de la activación",
    "plot.no_data": "sin datos",
    # ---------------------------------------------------------------- compare
    "compare.description": "con y sin BN, misma semilla y mismos pesos iniciales: curvas, "
                           "pasos hasta una precisión objetivo, tiempo (la demo)",
    "compare.title": "Entrenamiento con y sin normalización por lotes (batch normalization)",
    "compare.claim": "BN acelera el entrenamiento: con los mismos pesos iniciales, el mismo "
                     "orden de los datos y la misma tasa de aprendizaje, la red con BN alcanza "
                     "una precisión dada en menos pasos.",
    "compare.caption": "Pérdida (discontinua: entrenamiento, promediada desde el punto "
                       "anterior; continua: validación) y precisión en validación según el "
                       "paso de entrenamiento, con y sin BN.",
    "compare.note_both": "Con BN la red llegó a un {target:.0%} de precisión en validación en "
                         "{bn} pasos; sin BN necesitó {plain} pasos ({ratio:.1f} veces más).",
    "compare.note_bn_only": "Con BN la red llegó a un {target:.0%} de precisión en validación "
                            "en {bn} pasos; sin BN no llegó nunca.",
    "compare.note_none": "Ninguna red llegó a un {target:.0%} de precisión en validación con "
                         "estos pasos.",
    # ---------------------------------------------------------------- placement
    "placement.description": "BN después de la ReLU (el código del curso), antes de ella "
                             "(activación fusionada) y sin BN",
    "placement.title": "Dónde poner BN: antes o después de la activación",
    "placement.claim": "El artículo de BN normaliza la entrada de la no linealidad (BN antes "
                       "de la ReLU); el código Keras del curso la pone después. Las dos "
                       "entrenan; cuál es mejor depende del modelo.",
    "placement.caption": "BN después de la ReLU, antes de ella (nuestra BatchNorm2d(..., "
                         "activation='relu')) y sin BN, desde los mismos pesos iniciales.",
    # ---------------------------------------------------------------- batch-size
    "batch-size.description": "BN frente a GroupNorm y LayerNorm (y Batch Renorm, BN fantasma) "
                              "con tamaños de lote de 2 a 256",
    "batch-size.title": "Tamaño de lote: cuándo las estadísticas de BN se vuelven ruidosas",
    "batch-size.claim": "BN estima la media y la varianza con el minilote: con lotes muy "
                        "pequeños las estimaciones son ruidosas y las estadísticas de "
                        "entrenamiento y de inferencia no coinciden.",
    "batch-size.figure": "Precisión en validación según el tamaño de lote",
    "batch-size.caption": "Precisión final en validación (modo de evaluación) tras el mismo "
                          "número de épocas, con la tasa de aprendizaje proporcional al tamaño "
                          "de lote. Las estadísticas de BN salen del minilote, así que los "
                          "lotes pequeños la perjudican; GroupNorm y LayerNorm no dependen del "
                          "lote. Batch Renorm corrige las estadísticas del lote hacia las "
                          "móviles; la BN fantasma normaliza grupos de 8 muestras (solo lotes "
                          "de más de 8).",
    "batch-size.panel": "Precisión según el tamaño de lote",
    # ---------------------------------------------------------------- lr
    "lr.description": "un barrido de la tasa de aprendizaje con y sin BN",
    "lr.title": "Tasa de aprendizaje: cuánto amplía BN el rango utilizable",
    "lr.claim": "BN permite tasas de aprendizaje más altas: sin ella, las tasas grandes "
                "divergen o se estancan.",
    "lr.figure": "Precisión en validación según la tasa de aprendizaje",
    "lr.caption": "Precisión final en validación tras el mismo número de pasos para cada tasa "
                  "de aprendizaje (0 donde la pérdida divergió). BN mantiene fija la escala "
                  "de la entrada de cada capa, así que tolera tasas de aprendizaje mayores.",
    "lr.panel": "Precisión según la tasa de aprendizaje",
    # ---------------------------------------------------------------- init
    "init.description": "una inicialización mal escalada con y sin BN",
    "init.title": "Inicialización: BN hace el entrenamiento robusto a la escala de los pesos",
    "init.claim": "Sin BN, unos pesos iniciales demasiado pequeños o demasiado grandes hacen "
                  "que las señales se desvanezcan o exploten; con BN la entrada de cada capa "
                  "se vuelve a normalizar.",
    "init.figure": "Precisión en validación según la escala de los pesos iniciales",
    "init.caption": "Cada peso de las capas convolucionales y lineales, multiplicado por un "
                    "factor tras la inicialización por defecto. BN vuelve a normalizar la "
                    "salida de cada capa, así que la escala de los pesos anteriores apenas "
                    "importa.",
    "init.panel": "Precisión según la escala inicial de los pesos",
    # ---------------------------------------------------------------- modes
    "modes.description": "los errores de inferencia, medidos: evaluar en modo de "
                         "entrenamiento, un lote de una imagen, estadísticas móviles "
                         "desfasadas tras un cambio en los datos",
    "modes.title": "Modo de entrenamiento frente a modo de inferencia",
    "modes.claim": "BN se comporta de forma distinta en entrenamiento (estadísticas del lote; "
                   "las estadísticas móviles se actualizan) y en inferencia (estadísticas "
                   "móviles, fijas): olvidar model.eval(), los lotes diminutos y las "
                   "estadísticas desfasadas tras un cambio en los datos cuestan precisión.",
    "modes.eval": "modo de evaluación (correcto)",
    "modes.train_500": "modo de entrenamiento, lotes de 500",
    "modes.train_8": "modo de entrenamiento, lotes de 8",
    "modes.single": "modo de evaluación, una imagen cada vez",
    "modes.stale": "datos desplazados, estadísticas desfasadas",
    "modes.recomputed": "datos desplazados, estadísticas recalculadas",
    "modes.note_eval": "En modo de evaluación una predicción no depende del resto del lote: "
                       "una imagen cada vez da {single:.1%} y lotes de 500 dan {batched:.1%}.",
    "modes.note_single_ran": "Un lote de una imagen en modo de entrenamiento funcionó (las "
                             "posiciones espaciales dieron las estadísticas).",
    "modes.note_single_fails": "Un lote de una imagen en modo de entrenamiento falla: la capa "
                               "BN densa lanza «{error}». Incluso donde funciona, las "
                               "estadísticas de una sola imagen borrarían al normalizar "
                               "justo los rasgos que la identifican.",
    "modes.note_shift": "El cambio reduce el contraste a la mitad y aclara las imágenes, como "
                        "podría hacerlo una cámara nueva. Recalcular las estadísticas móviles "
                        "con imágenes de entrenamiento cambiadas, sin tocar ningún peso, "
                        "cambia la precisión en {gain:+.1%}.",
    "modes.figure": "Una red entrenada, evaluada de varias formas",
    "modes.caption": "Precisión en validación de la misma red con BN ya entrenada: en modo de "
                     "evaluación (estadísticas móviles), en modo de entrenamiento por error "
                     "(estadísticas de lotes de 500 u 8 imágenes), con una imagen cada vez, y "
                     "con datos desplazados antes y después de recalcular las estadísticas "
                     "móviles.",
    "modes.panel": "Precisión en validación de la red con BN",
    # ---------------------------------------------------------------- regularization
    "regularization.description": "la brecha entre entrenamiento y validación con y sin BN",
    "regularization.title": "¿Regulariza BN?",
    "regularization.claim": "BN añade ruido (cada muestra se normaliza con las estadísticas de "
                            "su lote), que actúa como un regularizador suave: la brecha entre "
                            "la precisión en entrenamiento y en validación puede reducirse.",
    "regularization.figure": "Precisión en entrenamiento frente a validación",
    "regularization.caption": "Entrenamiento con {size} imágenes durante muchas épocas: las "
                              "líneas discontinuas son la precisión en entrenamiento (en modo "
                              "de entrenamiento, promediada desde el punto anterior) y las "
                              "continuas la precisión en validación. El espacio entre ellas "
                              "es la brecha de generalización.",
    "regularization.curves_caption": "Pérdida y precisión en validación de las mismas redes.",
    # ---------------------------------------------------------------- distributions, paper-mnist
    "distributions.description": "percentiles (15/50/85) de las activaciones de cada capa "
                                 "durante el entrenamiento, con y sin BN (figura 1 b/c del "
                                 "artículo)",
    "distributions.title": "Cómo se mueve la entrada de una sigmoide durante el entrenamiento",
    "distributions.claim": "Desplazamiento interno de covariables (internal covariate shift): "
                           "sin BN la distribución de la entrada de cada capa no deja de "
                           "cambiar mientras aprenden las capas anteriores; BN mantiene fijas "
                           "su media y su dispersión.",
    "distributions.note_drift": "«{column}» es cuánto se movió la mediana de la entrada de la "
                                "capa {layer} entre el primer y el último paso registrados.",
    "paper-mnist.description": "la figura 1 del artículo de BN con MNIST completo: lotes de "
                               "60, 50 000 pasos (--quick: 3000), precisión en prueba y la "
                               "entrada de una sigmoide",
    "paper-mnist.title": "El experimento con MNIST del artículo de BN",
    "paper-mnist.claim": "Ioffe y Szegedy (2015), figura 1: con BN la red entrena más rápido y "
                         "alcanza más precisión en prueba, y la distribución de la entrada de "
                         "sus sigmoides es estable.",
    "paper.accuracy_figure.validation": "Precisión en validación según el paso de "
                                        "entrenamiento",
    "paper.accuracy_figure.test": "Precisión en prueba según el paso de entrenamiento",
    "paper.accuracy_caption.validation": "Figura 1(a) del artículo: precisión en validación "
                                         "de la red sigmoide 784-100-100-100-10 con y sin BN.",
    "paper.accuracy_caption.test": "Figura 1(a) del artículo: precisión en prueba de la red "
                                   "sigmoide 784-100-100-100-10 con y sin BN.",
    "paper.sigmoid_figure": "La entrada de una sigmoide de la última capa oculta durante el "
                            "entrenamiento",
    "paper.sigmoid_caption": "Figura 1(b, c) del artículo: los percentiles 15, 50 y 85 (banda "
                             "y línea) de los valores que entran en las sigmoides de una capa. "
                             "Sin BN la distribución se desplaza a medida que cambian las "
                             "capas anteriores; con BN se queda donde está.",
    "paper.sigmoid_panel": "Entrada de una sigmoide, {label}",
    # ---------------------------------------------------------------- report.html
    "report.page_title": "{title} · laboratorio batchnorm",
    "report.kicker": "laboratorio batchnorm · {experiment}",
    "report.claim": "Afirmación puesta a prueba.",
    "report.reproduce": "Reproducir",
    "report.summary": "Resumen",
    "report.findings": "Observaciones",
    "report.figures": "Figuras",
    "report.no_rows": "(sin filas)",
    "env.date": "fecha",
    "env.device": "dispositivo",
    "env.cpu_threads": "hilos de CPU",
    "env.wall_time": "tiempo total",
    # ---------------------------------------------------------------- terminal
    "progress.unit": "paso",
    "cli.report": "informe: {path}  ({seconds:.1f} s)",
    "cli.interrupted": "interrumpido: las ejecuciones terminadas se conservan; repite la misma "
                       "orden para continuar",
    "cli.error": "batchnorm: error: {message}",
    "cli.positive_int": "se esperaba un entero positivo, se recibió {value}",
    "cli.positive_float": "se esperaba un número positivo, se recibió {value}",
    "cli.description": "Normalización por lotes (batch normalization) para PyTorch: el "
                       "laboratorio e información sobre los backends.",
    "cli.epilog": "ejemplos:\n"
                  "  batchnorm lab compare          # la demo: entrenar con y sin BN y "
                  "escribir un informe\n"
                  "  batchnorm lab compare --lang en  # lo mismo, informe en inglés\n"
                  "  batchnorm lab list             # todos los experimentos, uno por línea\n"
                  "  batchnorm info                 # versiones y el backend de cada "
                  "dispositivo\n",
    "cli.info_help": "versiones y el backend que usaría cada dispositivo",
    "cli.lab_help": "entrenar redes pequeñas con y sin BN y escribir un informe",
    "cli.lab_description": "Ejecuta uno de los experimentos del laboratorio y escribe un "
                           "informe con gráficas.",
    "cli.lab_epilog": "experimentos:\n{experiments}\n\nejemplos:\n"
                      "  batchnorm lab compare\n"
                      "  batchnorm lab batch-size --quick\n"
                      "  batchnorm lab paper-mnist --data-root .cache/mnist\n"
                      "  batchnorm lab compare --device cuda --json\n"
                      "  batchnorm lab compare --lang en",
    "cli.help.experiment": "el nombre de un experimento, o 'list'",
    "cli.help.dataset": "conjunto de datos (por defecto: el del experimento; mnist5k viene "
                        "con la instalación)",
    "cli.help.data_root": "carpeta con los archivos del conjunto de datos (make data: "
                          ".cache/mnist)",
    "cli.help.out": "carpeta donde se crean las carpetas de resultados (por defecto: runs)",
    "cli.help.device": "cpu o cuda (por defecto: cpu)",
    "cli.help.seed": "semilla de todas las ejecuciones (por defecto: 0)",
    "cli.help.epochs": "épocas por ejecución",
    "cli.help.steps": "pasos del optimizador por ejecución (en lugar de --epochs)",
    "cli.help.batch_size": "tamaño del minilote",
    "cli.help.lr": "tasa de aprendizaje",
    "cli.help.arch": "red",
    "cli.help.quick": "una configuración diminuta (segundos)",
    "cli.help.json": "imprimir el resultado como JSON (claves del resumen en inglés, sea cual "
                     "sea --lang)",
    "cli.help.no_progress": "sin barras de progreso",
    "cli.help.lang": "idioma del informe y de la salida en la terminal (por defecto: según "
                     "LC_ALL, LC_MESSAGES o LANG, aquí {default})",
    "error.unknown_experiment": "experimento desconocido {name!r}; se esperaba uno de: {names}",
    "error.no_cuda": "se pidió --device cuda pero CUDA no está disponible",
}
