"""Words and colours shared by every `mmdit synth` kind: sentence and phrase banks, the palette.

The sentence lists feed the pure and compositional kinds; the short phrase banks (titles,
buttons, prices...) fill the complex kind's layouts, one bank per text role and language.
"""

EN_SENTENCES = (
    "Hello, world!",
    "Fresh coffee every morning",
    "The quick brown fox jumps over the lazy dog.",
    "Open 24 hours",
    "Welcome to the city library",
    "Summer sale: everything must go",
    "Keep calm and carry on",
    "Mind the gap between the train and the platform.",
    "Please recycle your bottles and cans",
    "Grand opening this Saturday at 10 AM",
    "Knowledge is power.",
    "Turn left at the next intersection",
    "Handmade bread and pastries",
    "No parking on weekdays",
    "The best way to predict the future is to invent it.",
    "Quiet please, exam in progress",
    "Live music every Friday night",
    "Today's special: tomato soup",
    "Think different, work together",
    "Exit only",
    "Happy birthday, Anna!",
    "Flight 372 to Tokyo is now boarding at gate 12.",
    "Fresh flowers for every occasion",
    "Do not feed the animals",
    "Learning never exhausts the mind.",
    "Train your model, then test it twice.",
    "All good things come to those who wait",
    "Reserved for guests of the hotel",
    "Wet paint, do not touch",
    "A journey of a thousand miles begins with a single step.",
    "Museum of modern art, second floor",
    "Bicycle repair and rental",
)

ZH_SENTENCES = (
    "你好，世界！",
    "欢迎光临",
    "今天天气很好，我们去公园散步吧。",
    "学而时习之，不亦说乎。",
    "新鲜咖啡，每日现磨",
    "请勿吸烟",
    "图书馆开放时间：上午九点至晚上九点",
    "前方施工，请绕行。",
    "春眠不觉晓，处处闻啼鸟。",
    "小心地滑",
    "知识就是力量",
    "全场商品八折优惠",
    "祝你生日快乐！",
    "地铁二号线换乘通道",
    "书山有路勤为径，学海无涯苦作舟。",
    "保持安静，考试进行中",
    "手工面包与甜点",
    "出口",
    "千里之行，始于足下。",
    "节约用水，人人有责",
    "周末音乐会，晚上八点开始",
    "床前明月光，疑是地上霜。",
    "欢迎来到北京",
    "营业时间：全天二十四小时",
    "熟能生巧",
    "海内存知己，天涯若比邻。",
    "请排队上车",
    "明天会更好",
    "山不在高，有仙则名。",
    "中文文字渲染测试",
    "人工智能改变生活",
    "一分耕耘，一分收获。",
)

# Short phrases by layout role, per language (the complex kind's text boxes).
PHRASES = {
    "en": {
        "title": (
            "Quarterly Sales Review", "Project Roadmap", "Welcome to the Team", "Machine Learning Basics",
            "Weekend Farmers Market", "Summer Music Festival", "City Marathon 2025", "Product Launch",
            "Healthy Eating Guide", "Annual Report", "Book Club Night", "Grand Opening", "Travel Planner",
            "Coffee House", "Photo Contest", "Open Source Day", "Science Fair", "Winter Collection",
        ),
        "subtitle": (
            "Prepared by the design team", "Everything you need in one place", "Spring edition",
            "Join us this weekend", "Results and next steps", "Simple, fast and free", "For beginners",
            "Limited time only", "A guide for new members", "Made with love in our kitchen",
        ),
        "bullet": (
            "Revenue grew 12% year over year", "Ship the beta in March", "Hire two more engineers",
            "Customer rating: 4.8 out of 5", "Reduce costs by 10%", "Launch in three new cities",
            "Train the model on more data", "Free shipping on all orders", "Weekly team meetings",
            "Open to all ages", "Bring your own cup", "Collect feedback from users", "Fix the login bug",
            "New office opens in May", "Track progress every Friday",
        ),
        "button": (
            "Sign up", "Buy now", "Learn more", "Cancel", "Continue", "Log in", "Download", "Subscribe",
            "Add to cart", "Book a table", "Get started", "Contact us", "Register", "Try it free",
        ),
        "nav": ("Home", "About", "Products", "Contact", "Blog", "Pricing", "Events", "Shop", "Help", "News"),
        "item": (
            "Wireless headphones", "Green tea, 100 g", "Running shoes", "Desk lamp", "Notebook set",
            "Ceramic mug", "Travel backpack", "Sunflower seeds", "Yoga mat", "Phone charger",
            "Chocolate cake", "Apple juice",
        ),
        "price": ("$19.99", "$5.00", "$129", "Only $9.99", "$49.50", "2 for $10", "$0.99", "$249"),
        "date": (
            "Saturday, June 14, 7 PM", "May 3 - May 5", "Every Sunday, 9 AM", "Friday 8 PM",
            "July 21, 2025", "10:00 - 18:00", "Tonight at 9",
        ),
        "footer": (
            "© 2025 Example Inc.", "www.example.com", "Page 3 of 12", "Confidential", "Thank you!",
            "123 Main Street", "Follow us @example", "All rights reserved",
        ),
        "heading": ("Fast", "Secure", "Friendly", "Reliable", "Simple", "Affordable", "Open", "Local"),
        "brand": ("Acme", "Sunrise Cafe", "Pixel Studio", "GreenLeaf", "Bluebird", "Northwind", "Maple & Co."),
        "status": ("9:41", "12:30", "08:15", "17:05", "22:48"),
        "search": ("Search", "Search products", "Find a place", "Search recipes", "What are you looking for?"),
    },
    "zh": {
        "title": (
            "季度销售回顾", "项目路线图", "欢迎加入团队", "机器学习入门", "周末农贸市场", "夏日音乐节",
            "城市马拉松", "新品发布会", "健康饮食指南", "年度报告", "读书会之夜", "盛大开业", "旅行计划",
            "咖啡小馆", "摄影大赛", "开源日", "科技展览", "冬季新品",
        ),
        "subtitle": (
            "设计团队出品", "一站式服务", "春季特别版", "本周末与我们相约", "成果与下一步", "简单快速免费",
            "新手入门", "限时优惠", "新成员指南", "用心烘焙每一天",
        ),
        "bullet": (
            "营收同比增长百分之十二", "三月发布测试版", "再招聘两名工程师", "用户评分四点八分", "成本降低百分之十",
            "进入三个新城市", "用更多数据训练模型", "全场包邮", "每周例会", "老少皆宜", "自带水杯有优惠",
            "收集用户反馈", "修复登录问题", "五月新办公室启用", "每周五跟进进度",
        ),
        "button": ("立即注册", "立即购买", "了解更多", "取消", "继续", "登录", "下载", "订阅", "加入购物车",
                   "预订座位", "开始使用", "联系我们", "报名", "免费试用"),
        "nav": ("首页", "关于我们", "产品", "联系", "博客", "价格", "活动", "商城", "帮助", "新闻"),
        "item": ("无线耳机", "绿茶一百克", "跑步鞋", "台灯", "笔记本套装", "陶瓷杯", "旅行背包", "瓜子",
                 "瑜伽垫", "手机充电器", "巧克力蛋糕", "苹果汁"),
        "price": ("¥99", "¥19.9", "特价¥39", "¥129", "仅售¥9.9", "两件¥50", "¥1288", "¥6.5"),
        "date": ("六月十四日晚上七点", "五月三日至五日", "每周日上午九点", "周五晚八点", "2025年7月21日",
                 "10:00 - 18:00", "今晚九点"),
        "footer": ("版权所有 © 2025", "www.example.cn", "第3页，共12页", "内部资料", "谢谢观看！", "人民路123号",
                   "关注我们的公众号", "保留所有权利"),
        "heading": ("快速", "安全", "友好", "可靠", "简单", "实惠", "开放", "本地"),
        "brand": ("晨光咖啡", "像素工作室", "绿叶生活", "青鸟书店", "北风科技", "小满烘焙"),
        "status": ("9:41", "12:30", "08:15", "17:05", "22:48"),
        "search": ("搜索", "搜索商品", "查找地点", "搜索菜谱", "你想找什么？"),
    },
}

# (English name, Chinese name, RGB)
PALETTE = (
    ("white", "白色", (250, 250, 250)),
    ("black", "黑色", (20, 20, 20)),
    ("red", "红色", (200, 30, 30)),
    ("dark blue", "深蓝色", (20, 40, 120)),
    ("light blue", "浅蓝色", (150, 200, 240)),
    ("green", "绿色", (30, 140, 60)),
    ("dark green", "深绿色", (20, 80, 40)),
    ("yellow", "黄色", (245, 210, 40)),
    ("orange", "橙色", (240, 130, 30)),
    ("purple", "紫色", (120, 50, 160)),
    ("pink", "粉色", (240, 160, 190)),
    ("gray", "灰色", (128, 128, 128)),
    ("light gray", "浅灰色", (220, 220, 220)),
    ("brown", "棕色", (120, 80, 40)),
    ("teal", "青色", (0, 128, 128)),
    ("beige", "米色", (235, 225, 200)),
)
COLORS = {en: (zh, rgb) for en, zh, rgb in PALETTE}
MIN_CONTRAST = 0.35
"""Minimum luminance difference between text and every background colour (readable text)."""


def luminance(rgb: tuple[int, ...]) -> float:
    r, g, b = rgb[:3]
    return (0.299 * r + 0.587 * g + 0.114 * b) / 255.0


def readable_on(rgbs: list[tuple[int, ...]]) -> list[str]:
    """Palette names that stay readable on every one of these colours."""
    lums = [luminance(rgb) for rgb in rgbs]
    return [n for n, (_, rgb) in COLORS.items() if all(abs(luminance(rgb) - l) >= MIN_CONTRAST for l in lums)]


def zh_name(color: str) -> str:
    return COLORS[color][0]


def rgb(color: str) -> tuple[int, int, int]:
    return COLORS[color][1]
